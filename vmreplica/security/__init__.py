"""Who may talk to whom: the secured broker's certificates and principals, the sites' signing
keys and authorization entries, and the encryption of cycle payloads.

Everything read from Kafka is untrusted until a module here has checked it.
"""
