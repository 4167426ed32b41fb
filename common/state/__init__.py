"""State kept in Redis (one key layout: keys.py): job records, ops flags, limits, webhooks, ending a job."""
