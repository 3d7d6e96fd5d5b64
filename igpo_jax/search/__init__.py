"""Search back-ends (Serper, Bing, local retriever, mock), cache and the embedded retriever server."""
