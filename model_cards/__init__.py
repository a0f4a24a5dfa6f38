"""Jinja templates for model cards (packaged as shortgpt_hf.model_cards)."""
