"""Score pipeline decisions against labelled truth."""
