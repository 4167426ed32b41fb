"""State kept in Redis: job records and their transitions (one key layout: keys.py), ops flags, limits,
orphan recovery, webhook deliveries, ending a job."""
