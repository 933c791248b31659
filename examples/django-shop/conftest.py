"""pytest for the example: Django's settings, set up once; the hedwig-tasks plugin is loaded by its entry point."""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
os.environ["HEDWIG_TRANSPORT_URL"] = "memory://shop"  # tests never touch the bus file
django.setup()
