"""Operations: the HTTP endpoint, metrics, health and the live page."""
