"""The offline commands behind ``merc``: fine-tune a text encoder, train, evaluate, extract features
from media. They call service.jobs.runner / service.features and models, as a job does."""
