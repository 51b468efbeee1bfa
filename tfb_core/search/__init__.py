"""Finding sigma: the search strategies, the objectives of both kinds (classifier, generation), and the cache."""
