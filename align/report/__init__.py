"""Step 7, report: report.json is the only truth (schema.py builds it, files.py writes it
whole or not at all); the console (console.py), HTML (html.py), JUnit (junit.py) and the
side-by-side page (side_by_side.py) are rendered from the JSON alone; messages.py words a
mismatch as torch.testing does."""
