"""Persistence: settings, database models and migrations, blob store, document parsing.

Kept import-light on purpose: import the submodule you need
(`storage.settings`, `storage.db`, `storage.models`, `storage.blobs`).
"""
