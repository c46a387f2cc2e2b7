"""The CDI data types as one table-driven spec.

Per data type: the columns a source table must/may have, the Braze endpoint and batch limits, the
pandera schema every row must pass, and how a valid row becomes a Braze API object. Adding a data type
(catalogs were added so) is one more `DataTypeSpec`, not a new code path.

Validation works on a batch of rows in two steps. `validate_batch` works out each row's facts:
identifier kinds and sizes column-wise, and the PAYLOAD parsed once per row (JSON, sizes, the type's
own field rules). The data type's pandera schema then judges the facts of the whole batch, so every
rule is declared in one place and each failing rule becomes one specific, human reason on that row
(`validate_facts`). Facts are numbers (codes and counts) so pandera judges them at numpy speed; the
sentences behind a non-zero `*_problem` fact are kept beside the frame.

The package, one job per module: `spec` (the table), `rows` (rows as columns), `payload_rules`
(what a PAYLOAD must be), `validation` (facts judged by pandera), `objects` (rows as Braze objects).
"""

from braze_assets.datatypes.objects import braze_times, build_objects, identifier_fields
from braze_assets.datatypes.payload_rules import MAX_NESTING, attribute_count, parse_braze_time
from braze_assets.datatypes.rows import (
    IdentifierValueError,
    RowBatch,
    identifier_arrays,
    identifier_texts,
    payload_text,
    row_identifiers,
)
from braze_assets.datatypes.spec import (
    DATA_TYPES,
    IDENTIFIER_COLUMNS,
    IDENTIFIER_KINDS,
    KIND_BITS,
    DataTypeSpec,
    allowed_kind_codes,
    kinds_of,
)
from braze_assets.datatypes.validation import (
    SCHEMAS,
    CheckedRows,
    validate_batch,
    validate_facts,
    validate_rows,
)

__all__ = [
    "DATA_TYPES",
    "IDENTIFIER_COLUMNS",
    "IDENTIFIER_KINDS",
    "KIND_BITS",
    "MAX_NESTING",
    "SCHEMAS",
    "CheckedRows",
    "DataTypeSpec",
    "IdentifierValueError",
    "RowBatch",
    "allowed_kind_codes",
    "attribute_count",
    "braze_times",
    "build_objects",
    "identifier_arrays",
    "identifier_fields",
    "identifier_texts",
    "kinds_of",
    "parse_braze_time",
    "payload_text",
    "row_identifiers",
    "validate_batch",
    "validate_facts",
    "validate_rows",
]
