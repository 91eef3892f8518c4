"""Stateful step-by-step serving of recurrent models: loads model_store artifacts only."""
