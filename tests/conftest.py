"""Shared test helpers live in this folder (e.g. cs_project.py); pytest puts it on sys.path for this conftest."""
