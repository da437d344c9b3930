"""The MPM kit (arXiv 2308.12038): pivot models shipped by PyPI packages (`pivots`), bilingual data tools (`data`),
offline evaluation (`evaluation`), and the chat models of the OpenMoji experiments, whose trained default the demos
serve (`chat_models`). The `demo` extra installs what they read."""
