# A partial stub of scikit-learn: only what the examples use (the digits data and its split).
