# Thin wrappers around ./dev, which installs its own prerequisites.
.PHONY: setup demo test bench fuzz release check-config

setup:
	./dev setup

demo:
	./dev demo

test:
	./dev test

bench:
	./dev bench

fuzz:
	./dev fuzz

release:
	cargo build --release

check-config:
	cargo run -- check-config conf/edge.toml
