package dev.keyroom.apksigner;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.InvalidKeyException;
import java.security.InvalidParameterException;
import java.security.Key;
import java.security.KeyStoreException;
import java.security.KeyStoreSpi;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.PublicKey;
import java.security.SignatureException;
import java.security.SignatureSpi;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collections;
import java.util.Date;
import java.util.Enumeration;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.TimeUnit;

/**
 * A JCA provider through which {@code apksigner sign} signs with a key that never leaves keyroom's HSM.
 *
 * <p>apksigner builds the APK's v2/v3 signed data and hands each block to {@code Signature.sign()}; this
 * provider sends the block to {@code kubectl-keyroom apksigner sign}, which makes one SignRequest for the
 * APK (both schemes' blocks), waits for the policy's approvals and prints the signer's signatures. The
 * signatures are kept for the rest of the run, so the second scheme's block needs no second request. The
 * KeyStore type {@code KEYROOM} holds one entry: the Certificate named in the configuration, as
 * {@code kubectl-keyroom apksigner certificate} prints it, and a key that only this provider's
 * signatures accept.
 *
 * <pre>
 * apksigner sign --provider-class dev.keyroom.apksigner.KeyroomProvider \
 *     --provider-arg namespace=team-a,key=android-release,certificate=android-release-cert \
 *     --ks NONE --ks-type KEYROOM --ks-pass pass:none --min-sdk-version 24 --in app.apk --out app-signed.apk
 * </pre>
 *
 * <p>The argument is comma-separated {@code name=value} pairs, or the path of a properties file with
 * them: {@code namespace}, {@code key}, {@code certificate} (required); {@code reason}, {@code name}
 * (the APK's name approvers see; default: apksigner's input file), {@code timeout} (seconds to wait for
 * approvals, default 600), {@code context}, {@code kubeconfig}, {@code command} (default
 * {@code kubectl-keyroom}), {@code maxSdk} (default: apksigner's --max-sdk-version) and {@code v3MinSdk}
 * (the v3 signed data's minimum SDK, default what apksig writes) when apksigner is run as a library.
 */
public final class KeyroomProvider extends Provider {
    private static final long serialVersionUID = 1L;
    public static final String KEYSTORE_TYPE = "KEYROOM";
    private static final String[] SIGNATURES = {"SHA256withECDSA", "SHA512withECDSA", "SHA256withRSA", "SHA512withRSA"};

    public KeyroomProvider() {
        this("");
    }

    public KeyroomProvider(String argument) {
        super("Keyroom", "1.0", "keyroom: APK signatures by keyroom's signer, through approved SignRequests");
        Session session = new Session(Config.parse(argument));
        putService(new Service(this, "KeyStore", KEYSTORE_TYPE, KeyroomKeyStore.class.getName(), null, null) {
            @Override
            public Object newInstance(Object parameter) {
                return new KeyroomKeyStore(session);
            }
        });
        Map<String, String> attributes = Map.of("SupportedKeyClasses", KeyroomPrivateKey.class.getName());
        for (String algorithm : SIGNATURES) {
            putService(new Service(this, "Signature", algorithm, KeyroomSignature.class.getName(), null, attributes) {
                @Override
                public Object newInstance(Object parameter) {
                    return new KeyroomSignature();
                }
            });
        }
    }

    /** The provider's settings, from its one constructor argument. */
    static final class Config {
        final Map<String, String> values;

        private Config(Map<String, String> values) {
            this.values = values;
        }

        static Config parse(String argument) {
            Map<String, String> values = new LinkedHashMap<>();
            String text = argument == null ? "" : argument.trim();
            if (!text.isEmpty() && !text.contains("=") && Files.isRegularFile(Path.of(text))) {
                Properties properties = new Properties();
                try (InputStream in = Files.newInputStream(Path.of(text))) {
                    properties.load(in);
                } catch (IOException e) {
                    throw new UncheckedIOException("keyroom: cannot read the provider's settings " + text, e);
                }
                for (String name : properties.stringPropertyNames()) {
                    values.put(name, properties.getProperty(name).trim());
                }
            } else if (!text.isEmpty()) {
                for (String pair : text.split(",")) {
                    int equals = pair.indexOf('=');
                    if (equals <= 0) {
                        throw new IllegalArgumentException("keyroom: the provider argument is name=value pairs "
                                + "separated by commas (or a properties file); not '" + pair + "'");
                    }
                    values.put(pair.substring(0, equals).trim(), pair.substring(equals + 1).trim());
                }
            }
            return new Config(values);
        }

        String required(String name) throws KeyStoreException {
            String value = values.get(name);
            if (value == null || value.isEmpty()) {
                throw new KeyStoreException("keyroom: name the " + name + " in --provider-arg (namespace=...,"
                        + "key=...,certificate=...)");
            }
            return value;
        }

        String get(String name, String fallback) {
            String value = values.get(name);
            return value == null || value.isEmpty() ? fallback : value;
        }
    }

    /** One apksigner run: the certificate, and the signatures keyroom returned, by the SHA-256 of what they sign. */
    static final class Session {
        final Config config;
        private final Map<String, byte[]> signatures = new HashMap<>();
        private X509Certificate certificate;

        Session(Config config) {
            this.config = config;
        }

        synchronized X509Certificate certificate() throws KeyStoreException {
            if (certificate == null) {
                String name = config.required("certificate");
                byte[] pem = run(List.of("apksigner", "certificate", name), null, "read the Certificate " + name);
                try {
                    certificate = (X509Certificate) CertificateFactory.getInstance("X.509")
                            .generateCertificate(new ByteArrayInputStream(pem));
                } catch (CertificateException e) {
                    throw new KeyStoreException("keyroom: the Certificate " + name + " is no X.509 certificate", e);
                }
            }
            return certificate;
        }

        synchronized byte[] sign(byte[] data) throws SignatureException {
            String digest = sha256(data);
            byte[] known = signatures.get(digest);
            if (known != null) {
                return known.clone();
            }
            List<String> arguments = new ArrayList<>(List.of("apksigner", "sign"));
            try {
                arguments.addAll(List.of("--key", config.required("key"), "--certificate",
                        config.required("certificate")));
            } catch (KeyStoreException e) {
                throw new SignatureException(e.getMessage());
            }
            String[] apksigner = ProcessHandle.current().info().arguments().orElse(new String[0]);
            arguments.addAll(List.of("--name", config.get("name", apkName(apksigner)),
                    "--timeout", config.get("timeout", "600")));
            String maxSdk = config.get("maxSdk", option(apksigner, "--max-sdk-version"));
            if (maxSdk != null) {
                arguments.addAll(List.of("--max-sdk", maxSdk));
            }
            if (config.values.containsKey("v3MinSdk")) {
                arguments.addAll(List.of("--v3-min-sdk", config.values.get("v3MinSdk")));
            }
            if (config.values.containsKey("reason")) {
                arguments.addAll(List.of("--reason", config.values.get("reason")));
            }
            byte[] output;
            try {
                output = run(arguments, Base64.getEncoder().encode(data), "sign");
            } catch (KeyStoreException e) {
                throw new SignatureException(e.getMessage(), e);
            }
            for (String line : new String(output, StandardCharsets.US_ASCII).split("\n")) {
                String[] fields = line.trim().split(" ");
                if (fields.length == 2) {
                    signatures.put(fields[0], Base64.getDecoder().decode(fields[1]));
                }
            }
            known = signatures.get(digest);
            if (known == null) {
                throw new SignatureException("keyroom: the signer returned no signature for the signed data "
                        + "apksigner built (sha256:" + digest + ")");
            }
            return known.clone();
        }

        /** The APK apksigner was asked to sign (--in FILE, else its last .apk argument), for approvers to see. */
        private static String apkName(String[] arguments) {
            String found = option(arguments, "--in");
            for (int i = 0; found == null && i < arguments.length; i++) {
                if (arguments[arguments.length - 1 - i].endsWith(".apk")) {
                    found = arguments[arguments.length - 1 - i];
                }
            }
            return found == null ? "app.apk" : Path.of(found).getFileName().toString();
        }

        /** The value of apksigner's option {@code name}, or null. */
        private static String option(String[] arguments, String name) {
            for (int i = 0; i + 1 < arguments.length; i++) {
                if (arguments[i].equals(name)) {
                    return arguments[i + 1];
                }
            }
            return null;
        }

        /** kubectl-keyroom with these arguments and the target's; its stdout. Its stderr reaches the user. */
        private byte[] run(List<String> arguments, byte[] input, String what) throws KeyStoreException {
            List<String> command = new ArrayList<>();
            command.add(config.get("command", "kubectl-keyroom"));
            command.addAll(arguments);
            command.addAll(List.of("--namespace", config.required("namespace")));
            for (String option : new String[] {"context", "kubeconfig"}) {
                if (config.values.containsKey(option)) {
                    command.addAll(List.of("--" + option, config.values.get(option)));
                }
            }
            try {
                Process process = new ProcessBuilder(command).redirectError(ProcessBuilder.Redirect.INHERIT).start();
                try (OutputStream in = process.getOutputStream()) {
                    if (input != null) {
                        in.write(input);
                        in.write('\n');
                    }
                }
                byte[] output = process.getInputStream().readAllBytes();
                if (!process.waitFor(60, TimeUnit.SECONDS)) {
                    process.destroy();
                }
                if (process.exitValue() != 0) {
                    throw new KeyStoreException("keyroom: " + command.get(0) + " could not " + what + " (exit code "
                            + process.exitValue() + "; its message is above)");
                }
                return output;
            } catch (IOException e) {
                throw new KeyStoreException("keyroom: cannot run " + command.get(0) + " (install the kubectl plugin,"
                        + " or name it with command=PATH in --provider-arg): " + e.getMessage(), e);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new KeyStoreException("keyroom: interrupted", e);
            }
        }

        private static String sha256(byte[] data) {
            try {
                StringBuilder hex = new StringBuilder();
                for (byte b : MessageDigest.getInstance("SHA-256").digest(data)) {
                    hex.append(String.format("%02x", b));
                }
                return hex.toString();
            } catch (NoSuchAlgorithmException e) {
                throw new IllegalStateException(e);
            }
        }
    }

    /** A handle on the key in keyroom's HSM: no key material, only the session that asks for signatures. */
    static final class KeyroomPrivateKey implements PrivateKey {
        private static final long serialVersionUID = 1L;
        final transient Session session;
        private final String algorithm;

        KeyroomPrivateKey(Session session, String algorithm) {
            this.session = session;
            this.algorithm = algorithm;
        }

        @Override
        public String getAlgorithm() {
            return algorithm;
        }

        @Override
        public String getFormat() {
            return null;
        }

        @Override
        public byte[] getEncoded() {
            return null;
        }
    }

    /** The KEYROOM key store: one entry, named after the SigningKey, read-only. */
    public static final class KeyroomKeyStore extends KeyStoreSpi {
        private final Session session;

        KeyroomKeyStore(Session session) {
            this.session = session;
        }

        private String alias() {
            return session.config.get("key", "keyroom");
        }

        @Override
        public void engineLoad(InputStream stream, char[] password) throws IOException, CertificateException {
            if (stream != null) {
                throw new IOException("keyroom: the KEYROOM key store reads no file: give --ks NONE");
            }
            try {
                session.certificate();
            } catch (KeyStoreException e) {
                throw new IOException(e.getMessage(), e);
            }
        }

        @Override
        public Key engineGetKey(String alias, char[] password) {
            if (!alias().equals(alias)) {
                return null;
            }
            try {
                PublicKey key = session.certificate().getPublicKey();
                return new KeyroomPrivateKey(session, key.getAlgorithm());
            } catch (KeyStoreException e) {
                throw new IllegalStateException(e.getMessage(), e);
            }
        }

        @Override
        public Certificate[] engineGetCertificateChain(String alias) {
            Certificate certificate = engineGetCertificate(alias);
            return certificate == null ? null : new Certificate[] {certificate};
        }

        @Override
        public Certificate engineGetCertificate(String alias) {
            if (!alias().equals(alias)) {
                return null;
            }
            try {
                return session.certificate();
            } catch (KeyStoreException e) {
                throw new IllegalStateException(e.getMessage(), e);
            }
        }

        @Override
        public Date engineGetCreationDate(String alias) {
            return null;
        }

        @Override
        public Enumeration<String> engineAliases() {
            return Collections.enumeration(List.of(alias()));
        }

        @Override
        public boolean engineContainsAlias(String alias) {
            return alias().equals(alias);
        }

        @Override
        public int engineSize() {
            return 1;
        }

        @Override
        public boolean engineIsKeyEntry(String alias) {
            return alias().equals(alias);
        }

        @Override
        public boolean engineIsCertificateEntry(String alias) {
            return false;
        }

        @Override
        public String engineGetCertificateAlias(Certificate certificate) {
            return certificate != null && certificate.equals(engineGetCertificate(alias())) ? alias() : null;
        }

        @Override
        public void engineSetKeyEntry(String alias, Key key, char[] password, Certificate[] chain)
                throws KeyStoreException {
            throw new KeyStoreException("keyroom: keys are made by SigningKeys, not stored here");
        }

        @Override
        public void engineSetKeyEntry(String alias, byte[] key, Certificate[] chain) throws KeyStoreException {
            throw new KeyStoreException("keyroom: keys are made by SigningKeys, not stored here");
        }

        @Override
        public void engineSetCertificateEntry(String alias, Certificate cert) throws KeyStoreException {
            throw new KeyStoreException("keyroom: certificates are issued by Certificates, not stored here");
        }

        @Override
        public void engineDeleteEntry(String alias) throws KeyStoreException {
            throw new KeyStoreException("keyroom: the KEYROOM key store is read-only");
        }

        @Override
        public void engineStore(OutputStream stream, char[] password) throws IOException {
            throw new IOException("keyroom: the KEYROOM key store is read-only");
        }
    }

    /** Signs by asking keyroom; accepts only a KEYROOM key and verifies nothing (other providers verify). */
    public static final class KeyroomSignature extends SignatureSpi {
        private final ByteArrayOutputStream data = new ByteArrayOutputStream();
        private KeyroomPrivateKey key;

        @Override
        protected void engineInitSign(PrivateKey privateKey) throws InvalidKeyException {
            if (!(privateKey instanceof KeyroomPrivateKey)) {
                throw new InvalidKeyException("keyroom signs only with a key from the KEYROOM key store");
            }
            key = (KeyroomPrivateKey) privateKey;
            data.reset();
        }

        @Override
        protected void engineInitVerify(PublicKey publicKey) throws InvalidKeyException {
            throw new InvalidKeyException("keyroom's provider only signs");
        }

        @Override
        protected void engineUpdate(byte b) {
            data.write(b);
        }

        @Override
        protected void engineUpdate(byte[] b, int off, int len) {
            data.write(b, off, len);
        }

        @Override
        protected byte[] engineSign() throws SignatureException {
            if (key == null) {
                throw new SignatureException("not initialised for signing");
            }
            byte[] signed = data.toByteArray();
            data.reset();
            return key.session.sign(signed);
        }

        @Override
        protected boolean engineVerify(byte[] signature) throws SignatureException {
            throw new SignatureException("keyroom's provider only signs");
        }

        @Override
        @Deprecated
        protected void engineSetParameter(String param, Object value) {
            throw new InvalidParameterException("no parameters");
        }

        @Override
        @Deprecated
        protected Object engineGetParameter(String param) {
            throw new InvalidParameterException("no parameters");
        }
    }
}
