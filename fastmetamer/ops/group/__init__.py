"""Op family: group (entries grouped by an integer key: the CSR of an edge list; see fastmetamer.ops)."""
