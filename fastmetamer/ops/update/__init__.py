"""Op family: update (see fastmetamer.ops)."""
