import os

# deterministic, calm rendering for every Textual app a test starts
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")
