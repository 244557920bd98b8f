"""Reports on recorded spend: grouped totals, session lists, one session's calls, a live view.

`queries` reads the ledger, `formats` and `session_view` turn the results into tables, JSON,
CSV and markdown, `chart` draws cumulative spend, `watch` refreshes running sessions, and
`github` writes a run's summary for GitHub Actions.
"""
