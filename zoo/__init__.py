"""The models and data slimlab ships, apart from the core: LeNet, the MLPs, MiniLM's sentence embedding, the digits
and sentence sets, and loaders for common formats (tables, image folders, text, a Hugging Face directory).

Configs name them by import path (``model=lenet`` is ``slimlab.zoo.models.LeNet``), as they name a user's own
model: the core imports nothing from here, so any model and data go through the same door.
"""
