"""Split tensor formats of a layer block: Tucker and tensor-train."""
