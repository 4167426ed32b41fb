"""State kept in Redis: job records and their transitions, ops flags, limits, orphan recovery, ending a job."""
