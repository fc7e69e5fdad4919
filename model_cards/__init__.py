"""Model card templates, installed as ``hfrepair.model_cards`` (see pyproject.toml)."""
