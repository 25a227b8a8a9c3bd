"""three classes: the pneumonia-pattern finding and three-class labels

Revision ID: 0002_pneumonia
Revises: 0001
Create Date: 2026-11-30 23:40:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002_pneumonia'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('analyses', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pneumonia_probability', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('pneumonia_positive', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('pneumonia_threshold', sa.Float(), nullable=True))
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pneumonia_probability', sa.Float(), nullable=True))
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.add_column(sa.Column('label_name', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.drop_column('label_name')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('pneumonia_probability')
    with op.batch_alter_table('analyses', schema=None) as batch_op:
        batch_op.drop_column('pneumonia_threshold')
        batch_op.drop_column('pneumonia_positive')
        batch_op.drop_column('pneumonia_probability')
