package lanyard.interop;

import io.spiffe.bundle.jwtbundle.JwtBundleSet;
import io.spiffe.bundle.x509bundle.X509Bundle;
import io.spiffe.exception.JwtSvidException;
import io.spiffe.svid.jwtsvid.JwtSvid;
import io.spiffe.svid.x509svid.X509Svid;
import io.spiffe.workloadapi.DefaultWorkloadApiClient;
import io.spiffe.workloadapi.WorkloadApiClient;
import io.spiffe.workloadapi.X509Context;
import java.security.cert.X509Certificate;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collection;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

/**
 * A workload that talks to a SPIFFE Workload API (the one named by SPIFFE_ENDPOINT_SOCKET) with
 * java-spiffe, as a Java service would, and prints what it saw as one JSON object for the
 * Lanyard end-to-end tests (tests/tests/it/java_spiffe.rs) to check.
 *
 * <p>Usage: {@code JavaSpiffeClient AUDIENCE}. It fetches the X.509 context and the X.509
 * bundles, fetches a JWT-SVID for AUDIENCE, validates it through the Workload API and offline
 * against the JWT bundles, and checks that validation for another audience fails. Any error
 * propagates (exit status 1 with a stack trace); the whole run is bounded.
 */
public final class JavaSpiffeClient {
    private static final long TIMEOUT_SECONDS = 20;

    private JavaSpiffeClient() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: JavaSpiffeClient AUDIENCE  (with SPIFFE_ENDPOINT_SOCKET set)");
            System.exit(2);
        }
        ExecutorService executor = Executors.newSingleThreadExecutor();
        Future<String> result = executor.submit(() -> run(args[0]));
        // System.exit, because the executor's, gRPC's and Netty's threads keep the JVM alive.
        try {
            System.out.println(result.get(TIMEOUT_SECONDS, TimeUnit.SECONDS));
            System.exit(0);
        } catch (ExecutionException e) {
            e.getCause().printStackTrace();
        } catch (TimeoutException e) {
            System.err.println("timed out after " + TIMEOUT_SECONDS + " s");
        }
        System.exit(1);
    }

    private static String run(String audience) throws Exception {
        Map<String, Object> seen = new LinkedHashMap<>();
        try (WorkloadApiClient client = DefaultWorkloadApiClient.newClient()) {
            X509Context context = client.fetchX509Context();
            X509Svid svid = context.getDefaultSvid();
            X509Bundle bundle =
                    client.fetchX509Bundles().getBundleForTrustDomain(svid.getSpiffeId().getTrustDomain());
            seen.put("x509_spiffe_id", svid.getSpiffeId().toString());
            seen.put("x509_hint", svid.getHint());
            seen.put("x509_chain_pem", pem(svid.getChain()));
            seen.put("x509_bundle_pem", pem(bundle.getX509Authorities()));
            seen.put("x509_context_svids", context.getX509Svids().size());

            JwtSvid jwt = client.fetchJwtSvid(audience);
            seen.put("jwt_spiffe_id", jwt.getSpiffeId().toString());
            seen.put("jwt_audience", sorted(jwt.getAudience()));
            seen.put("jwt_token", jwt.getToken());

            JwtSvid validated = client.validateJwtSvid(jwt.getToken(), audience);
            seen.put("validated_spiffe_id", validated.getSpiffeId().toString());
            seen.put("validated_audience", sorted(validated.getAudience()));

            JwtBundleSet jwtBundles = client.fetchJwtBundles();
            JwtSvid offline =
                    JwtSvid.parseAndValidate(jwt.getToken(), jwtBundles, Collections.singleton(audience));
            seen.put("offline_spiffe_id", offline.getSpiffeId().toString());

            String wrongAudienceError = "";
            try {
                client.validateJwtSvid(jwt.getToken(), audience + "-other");
            } catch (JwtSvidException e) {
                // java-spiffe wraps the gRPC status, which says why.
                wrongAudienceError = e.getMessage() + ": " + e.getCause();
            }
            seen.put("wrong_audience_error", wrongAudienceError);
        }
        return json(seen);
    }

    private static List<String> sorted(Collection<String> values) {
        List<String> list = new ArrayList<>(values);
        Collections.sort(list);
        return list;
    }

    private static String pem(Collection<X509Certificate> certificates) throws Exception {
        Base64.Encoder base64 = Base64.getMimeEncoder(64, "\n".getBytes("US-ASCII"));
        StringBuilder out = new StringBuilder();
        for (X509Certificate certificate : certificates) {
            out.append("-----BEGIN CERTIFICATE-----\n")
                    .append(base64.encodeToString(certificate.getEncoded()))
                    .append("\n-----END CERTIFICATE-----\n");
        }
        return out.toString();
    }

    /** JSON for the strings, numbers, lists and maps this program prints. */
    private static String json(Object value) {
        if (value instanceof String) {
            StringBuilder out = new StringBuilder("\"");
            for (char c : ((String) value).toCharArray()) {
                if (c == '"' || c == '\\') {
                    out.append('\\').append(c);
                } else if (c < 0x20) {
                    out.append(String.format("\\u%04x", (int) c));
                } else {
                    out.append(c);
                }
            }
            return out.append('"').toString();
        }
        if (value instanceof Number || value instanceof Boolean) {
            return value.toString();
        }
        if (value instanceof List) {
            List<String> items = new ArrayList<>();
            for (Object item : (List<?>) value) {
                items.add(json(item));
            }
            return "[" + String.join(",", items) + "]";
        }
        if (value instanceof Map) {
            List<String> entries = new ArrayList<>();
            for (Map.Entry<?, ?> entry : ((Map<?, ?>) value).entrySet()) {
                entries.add(json(String.valueOf(entry.getKey())) + ":" + json(entry.getValue()));
            }
            return "{" + String.join(",", entries) + "}";
        }
        return value == null ? "null" : json(value.toString());
    }
}
