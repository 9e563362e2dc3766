"""End-to-end tests: brokers, gateways and workers as real processes, under faults and load."""
