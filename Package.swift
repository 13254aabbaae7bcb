// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "swift-exactly-once",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ExactlyOnce", targets: ["ExactlyOnce"]),
        .library(name: "ExactlyOnceTestKit", targets: ["ExactlyOnceTestKit"]),
        .library(name: "ExactlyOnceRedis", targets: ["ExactlyOnceRedis"]),
        .library(name: "ExactlyOnceFileStore", targets: ["ExactlyOnceFileStore"]),
        .library(name: "CouponKit", targets: ["CouponKit"]),
        .library(name: "ExactlyOnceKafka", targets: ["ExactlyOnceKafka"]),
        // librdkafka's C API as ExactlyOnceKafka sees it (for the benchmarks' raw-librdkafka baselines).
        .library(name: "CRdKafka", targets: ["CRdKafka"]),
        .executable(name: "coupon-demo", targets: ["CouponDemo"]),
        .executable(name: "exactly-once-admin", targets: ["ExactlyOnceAdmin"]),
        .library(name: "ExactlyOncePostgres", targets: ["ExactlyOncePostgres"]),
    ],
    traits: [
        // The PostgreSQL dedupe store (postgres-nio, SwiftNIO). Off by default, so depending on
        // ExactlyOnce alone builds neither: `swift build --traits Postgres`.
        .trait(name: "Postgres"),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swiftlang/swift-docc-plugin.git", from: "1.5.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
    ],
    targets: [
        .target(
            name: "ExactlyOnce",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ]
        ),
        .target(
            name: "ExactlyOnceTestKit",
            dependencies: ["ExactlyOnce", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "CouponKit",
            dependencies: [
                "ExactlyOnce", .product(name: "Logging", package: "swift-log"),
                .target(name: "ExactlyOncePostgres", condition: .when(traits: ["Postgres"])),
                .product(name: "PostgresNIO", package: "postgres-nio", condition: .when(traits: ["Postgres"])),
            ],
            path: "Examples/CouponKit"
        ),
        .executableTarget(
            name: "CouponDemo",
            dependencies: [
                "CouponKit", "ExactlyOnce", "ExactlyOnceFileStore", "ExactlyOnceRedis", "ExactlyOnceTestKit", "ExactlyOnceKafka",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .target(name: "ExactlyOncePostgres", condition: .when(traits: ["Postgres"])),
            ],
            path: "Examples/CouponDemo"
        ),
        .executableTarget(
            name: "ExactlyOnceAdmin",
            dependencies: [
                "ExactlyOnce", "ExactlyOnceFileStore", "ExactlyOnceRedis", "ExactlyOnceKafka",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .target(name: "ExactlyOncePostgres", condition: .when(traits: ["Postgres"])),
            ],
            path: "Tools/ExactlyOnceAdmin"
        ),
        .systemLibrary(
            name: "CHiredis",
            pkgConfig: "hiredis",
            providers: [.apt(["libhiredis-dev"]), .brew(["hiredis"])]
        ),
        .target(
            name: "ExactlyOnceRedis",
            dependencies: ["ExactlyOnce", "CHiredis", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "ExactlyOnceFileStore",
            dependencies: [
                "ExactlyOnce",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .target(
            name: "ExactlyOncePostgres",
            dependencies: [
                "ExactlyOnce",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "PostgresNIO", package: "postgres-nio", condition: .when(traits: ["Postgres"])),
            ]
        ),
        .testTarget(
            name: "ExactlyOncePostgresTests",
            dependencies: [
                "ExactlyOncePostgres", "ExactlyOnce", "ExactlyOnceTestKit", "CouponKit", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "PostgresNIO", package: "postgres-nio", condition: .when(traits: ["Postgres"])),
            ]
        ),
        .executableTarget(
            name: "FileStoreCrashChild",
            dependencies: ["ExactlyOnce", "ExactlyOnceFileStore"],
            path: "Tests/FileStoreCrashChild"
        ),
        .target(
            name: "TestSupport",
            dependencies: ["ExactlyOnce", "ExactlyOnceRedis"],
            path: "Tests/TestSupport"
        ),
        .testTarget(
            name: "ExactlyOnceFileStoreTests",
            dependencies: [
                "ExactlyOnceFileStore", "ExactlyOnce", "ExactlyOnceTestKit", "CouponKit", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "ExactlyOnceRedisTests",
            dependencies: [
                "ExactlyOnceRedis", "ExactlyOnce", "ExactlyOnceTestKit", "CouponKit", "TestSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .systemLibrary(
            name: "CRdKafka",
            pkgConfig: "rdkafka",
            providers: [.apt(["librdkafka-dev"]), .brew(["librdkafka"])]
        ),
        .target(
            name: "ExactlyOnceKafka",
            dependencies: ["ExactlyOnce", "CRdKafka", .product(name: "Logging", package: "swift-log")]
        ),
        .testTarget(
            name: "ExactlyOnceKafkaTests",
            dependencies: [
                "ExactlyOnceKafka", "CRdKafka", "ExactlyOnce", "ExactlyOnceTestKit", "CouponKit", "TestSupport", "ExactlyOnceRedis",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "ExactlyOnceTests",
            dependencies: [
                "ExactlyOnce", "ExactlyOnceTestKit", "CouponKit", "ExactlyOnceFileStore", "TestSupport",
                .product(name: "PropertyBased", package: "swift-property-based"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ]
        ),
    ]
)

for target in package.targets where [.executable, .test, .regular].contains(target.type) {
    var settings = target.swiftSettings ?? []
    settings.append(.enableUpcomingFeature("ExistentialAny"))
    settings.append(.enableUpcomingFeature("MemberImportVisibility"))
    target.swiftSettings = settings
}
