"""Text corpora for evaluation and calibration: a local data directory first, the public hubs second."""
from corpora.sources import (
    DataFormatError,
    DataNotFoundError,
    calibration_texts,
    evaluation_text,
    resolve_data_dir,
    zeroshot_file,
    instruction_records,
)
from corpora.calibration import calibration_batches, heldout_batches

__all__ = [
    "DataFormatError",
    "DataNotFoundError",
    "calibration_texts",
    "calibration_batches",
    "heldout_batches",
    "evaluation_text",
    "resolve_data_dir",
    "zeroshot_file",
    "instruction_records",
]
