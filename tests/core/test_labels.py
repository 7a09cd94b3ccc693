from skinml.core.labels import CLASS_INDEX, CLASSES, DIAGNOSES, NUM_CLASSES


def test_classes_are_in_the_documented_order_with_names():
    assert CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert NUM_CLASSES == 7
    assert [DIAGNOSES[c] for c in CLASSES] == [
        "Actinic keratoses", "Basal cell carcinoma", "Benign keratosis-like lesions",
        "Dermatofibroma", "Melanoma", "Melanocytic nevi", "Vascular lesions"]
    assert [CLASS_INDEX[c] for c in CLASSES] == list(range(7))
