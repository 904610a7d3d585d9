"""What the coordinator keeps: the database (tables, migrations, sessions), the double-entry ledger, the
content-addressed artifact store, each job's timeline, and the one place a job's row takes a
lifecycle transition (job_changes)."""
