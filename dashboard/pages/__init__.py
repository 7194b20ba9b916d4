"""Dashboard pages: see dashboard/app.py for what a page module provides."""
