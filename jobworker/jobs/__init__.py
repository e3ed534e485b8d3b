"""Jobs: their life cycle and manager, spawning and reaping processes, log files, the store."""
