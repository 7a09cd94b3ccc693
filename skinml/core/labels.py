"""The seven HAM10000 diagnoses: the one source of truth for class order and names."""

from __future__ import annotations

# Order matters: it is the index of every model output and of the `label` column.
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

DIAGNOSES: dict[str, str] = {
    "akiec": "Actinic keratoses",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesions",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevi",
    "vasc": "Vascular lesions",
}

NUM_CLASSES = len(CLASSES)

CLASS_INDEX: dict[str, int] = {dx: i for i, dx in enumerate(CLASSES)}



def probability_column(dx: str) -> str:
    """The served model's column holding the probability of diagnosis `dx`."""
    return f"p_{dx}"


PROBABILITY_COLUMNS: tuple[str, ...] = tuple(probability_column(dx) for dx in CLASSES)

# ISIC 2018 Task 3 ground-truth and submission columns, in the challenge's order.
ISIC_COLUMNS: dict[str, str] = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec",
                                "BKL": "bkl", "DF": "df", "VASC": "vasc"}
