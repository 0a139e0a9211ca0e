"""The first audit schema: records, data keys, checkpoints, meta.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("ts", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("actor_id", sa.String(128)),
        sa.Column("actor_name", sa.String(256)),
        sa.Column("actor_role", sa.String(32)),
        sa.Column("client", sa.String(64)),
        sa.Column("method", sa.String(16)),
        sa.Column("route", sa.String(256)),
        sa.Column("model", sa.String(128)),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("status", sa.Integer()),
        sa.Column("error_type", sa.String(64)),
        sa.Column("latency_us", sa.Integer()),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("content_policy", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(32)),
        sa.Column("nonce", sa.LargeBinary()),
        sa.Column("ciphertext", sa.LargeBinary()),
        sa.Column("content_digest", sa.String(64)),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_records_request_id", "audit_records", ["request_id"])
    op.create_index("ix_audit_records_ts", "audit_records", ["ts"])
    op.create_table(
        "audit_data_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created", sa.String(32), nullable=False),
        sa.Column("is_primary", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("origin", sa.String(36), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("head", sa.String(64), nullable=False),
        sa.Column("ts", sa.String(32), nullable=False),
        sa.Column("key", sa.String(16), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
    )
    op.create_table(
        "audit_meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_meta")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_data_keys")
    op.drop_index("ix_audit_records_ts", "audit_records")
    op.drop_index("ix_audit_records_request_id", "audit_records")
    op.drop_table("audit_records")
