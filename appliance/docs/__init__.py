"""The site's own documents, for grounded answers: text out of each file
(extract.py), cut into passages along its headings and paragraphs (chunk.py), kept
encrypted in SQLite under the appliance's keys (schema.py, store.py, migrations/),
searched by words and by meaning together (index.py), and put before a model with
numbered sources whose citations are checked (grounding.py)."""
