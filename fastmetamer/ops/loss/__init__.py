"""Op family: loss (see fastmetamer.ops)."""
