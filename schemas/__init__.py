"""Single source of truth for column names, table schemas and drop reasons."""

from schemas.columns import (  # noqa: F401
    DECISIONS_SCHEMA,
    FEATURES_SCHEMA,
    HARD_NEGATIVE_TYPE,
    LEDGER_SCHEMA,
    SAMPLE_JSON_COLUMNS,
    SHARD_SCHEMA,
    Col,
    Status,
    rows_to_table,
    to_table,
)
from schemas.reasons import (  # noqa: F401
    BEFORE_DOWNLOAD_REASONS,
    DOWNLOAD_FAILURE_REASONS,
    REASON_DESCRIPTIONS,
    TRANSIENT_REASONS,
    DropReason,
)
