"""The Kafka layer both sides use: reading that survives records the client cannot parse.

Neither ``producer`` (the agent side) nor ``aggregator`` owns it, so a billing consumer, the CLI
and the aggregator's process can use it without loading the agent framework.
"""
