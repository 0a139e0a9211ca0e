"""Alembic environment: always run with the connection the appliance hands over."""

from alembic import context

from appliance.docs.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
