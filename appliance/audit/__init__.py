"""The audit log: every request and administrative action as an encrypted,
hash-chained record in SQLite, sealed by signed checkpoints.

records.py (fields, canonical bytes), crypto.py (keys, AES-GCM, Ed25519), schema.py
(tables, engine), store.py (the single writer), chain.py (checkpoints, verify),
reader.py (decrypt, export, backup, purge); the Flask side is api/trail.py.
"""
