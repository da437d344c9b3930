"""The MPM kit (arXiv 2308.12038): pivot models shipped by PyPI packages (`pivots`), bilingual data tools (`data`),
offline evaluation (`evaluation`), and the trained OpenMoji defaults the demo serves (`openmoji`)."""
