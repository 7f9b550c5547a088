"""The base layer: patterns (pure data), their tile schedules and top-k rows. Imports nothing
from the rest of flashlite."""
