"""Step 6, diagnose: which module holds the bug (culprits.py), and the checks around a run
that say whether its numbers can be trusted: the observer effect (observer.py), the
environment (environment.py), dtype contracts (findings.py); repro.py writes a standalone
reproduction of the first culprit."""
