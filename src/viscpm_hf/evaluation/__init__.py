"""Offline evaluation of MPM models: answer language, answer correctness, retrieval accuracy and FID."""

from .answers import answer_names_emoji
from .fid import InceptionFeatures, frechet_distance
from .language import LanguageIdentifier
from .retrieval import retrieval_accuracy
