// swift-tools-version: 6.1
// Benchmarks live in a nested package so the library's dependency graph stays small.
// Run with `make bench` (release mode); the last line printed is one JSON object.
import PackageDescription

let package = Package(
    name: "exactly-once-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "swift-exactly-once", path: "..", traits: ["Postgres"]),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
    ],
    targets: [
        .executableTarget(
            name: "bench",
            dependencies: [
                .product(name: "ExactlyOnce", package: "swift-exactly-once"),
                .product(name: "CouponKit", package: "swift-exactly-once"),
                .product(name: "ExactlyOnceRedis", package: "swift-exactly-once"),
                .product(name: "ExactlyOnceFileStore", package: "swift-exactly-once"),
                .product(name: "ExactlyOnceKafka", package: "swift-exactly-once"),
                .product(name: "CRdKafka", package: "swift-exactly-once"),
                .product(name: "ExactlyOncePostgres", package: "swift-exactly-once"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            path: "Sources/Bench"
        )
    ]
)
