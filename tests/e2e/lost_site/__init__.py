"""A lost primary site: its agent and the only broker SIGKILLed, failover with no broker."""
