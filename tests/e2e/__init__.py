"""Browser tests: the public pages in a real headless Chromium."""
