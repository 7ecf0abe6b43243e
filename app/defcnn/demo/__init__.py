"""`defcnn demo`: the whole pipeline in one command (train, export, serve, attack, report).

This package sits on top of every stage (core, export, server, client); none of them
imports it.
"""
