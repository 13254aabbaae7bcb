// swift-tools-version: 6.1
// The coupon flash sale as a running HTTP service (Hummingbird 2) on the library, with the legacy
// Redis-lock design beside it. A nested package so the library's dependency graph stays small.
// Start it with `swift run coupon-service --port 8080` (embedded default, no servers needed).
// PostgreSQL as the source of truth is behind the trait `Postgres` (off by default, so the
// embedded default builds neither postgres-nio nor its TLS and crypto libraries):
// `swift run --traits Postgres coupon-service --store postgres --postgres-url URL`.
import PackageDescription

let package = Package(
    name: "coupon-service",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "coupon-service", targets: ["CouponServiceMain"]),
    ],
    traits: [
        .trait(name: "Postgres", description: "--store postgres: coupons, stock and issued coupons in PostgreSQL (postgres-nio)"),
    ],
    dependencies: [
        .package(name: "swift-exactly-once", path: "../..",
                 traits: [.trait(name: "Postgres", condition: .when(traits: ["Postgres"]))]),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
    ],
    targets: [
        .target(
            name: "CouponService",
            dependencies: [
                .product(name: "ExactlyOnce", package: "swift-exactly-once"),
                .product(name: "CouponKit", package: "swift-exactly-once"),
                .product(name: "ExactlyOnceRedis", package: "swift-exactly-once"),
                .product(name: "ExactlyOnceFileStore", package: "swift-exactly-once"),
                .product(name: "ExactlyOnceKafka", package: "swift-exactly-once"),
                .product(name: "ExactlyOncePostgres", package: "swift-exactly-once", condition: .when(traits: ["Postgres"])),
                .product(name: "PostgresNIO", package: "postgres-nio", condition: .when(traits: ["Postgres"])),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Sources/CouponService"
        ),
        .executableTarget(
            name: "CouponServiceMain",
            dependencies: [
                "CouponService",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Sources/CouponServiceMain"
        ),
        .testTarget(
            name: "CouponServiceTests",
            dependencies: [
                "CouponService",
                .product(name: "ExactlyOnce", package: "swift-exactly-once"),
                .product(name: "CouponKit", package: "swift-exactly-once"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Tests/CouponServiceTests"
        ),
    ]
)
