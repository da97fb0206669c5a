// Verifies a Sigstore bundle offline with @sigstore/verify, the library sigstore-js verifies with.
//
//   node verify-sigstore.js BUNDLE.json ARTIFACT PUBLIC-KEY.der [HINT]
//
// The verifier trusts exactly one public key (SubjectPublicKeyInfo DER), known under HINT, by default
// base64(sha256(key DER)): keyroom's hint. There is no transparency log, certificate transparency log or
// timestamp authority, so their thresholds are 0. Exit 0 and "verified" when the bundle's signature over the
// artifact verifies with that key; exit 1 and the library's error otherwise.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const { bundleFromJSON, assertBundleLatest } = require('@sigstore/bundle');
const { Verifier, toSignedEntity, toTrustMaterial } = require('@sigstore/verify');

function main([bundlePath, artifactPath, keyPath, hint]) {
  if (!keyPath) {
    throw new Error('usage: node verify-sigstore.js BUNDLE.json ARTIFACT PUBLIC-KEY.der [HINT]');
  }
  const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(bundlePath, 'utf8')));
  assertBundleLatest(bundle);
  const key = fs.readFileSync(keyPath);
  const name = hint || crypto.createHash('sha256').update(key).digest('base64');
  const trust = toTrustMaterial(
    { certificateAuthorities: [], timestampAuthorities: [], tlogs: [], ctlogs: [] },
    { [name]: { rawBytes: key } });
  const verifier = new Verifier(trust, { tlogThreshold: 0, ctlogThreshold: 0, timestampThreshold: 0 });
  const artifact = fs.readFileSync(artifactPath);
  const entity = toSignedEntity(bundle, artifact);
  verifier.verify(entity);
  // Without a tlog entry the library checks the signature over the artifact but not the bundle's
  // messageDigest; a bundle whose recorded digest is not the artifact's is wrong all the same.
  const algorithm = entity.signature.hashAlgorithm;
  if (!entity.signature.compareDigest(crypto.createHash(algorithm).update(artifact).digest())) {
    throw new Error(`the bundle's messageDigest is not the ${algorithm} of the artifact`);
  }
  console.log('verified');
}

try {
  main(process.argv.slice(2));
} catch (error) {
  console.error(`${error.name}: ${error.code ? error.code + ': ' : ''}${error.message}`);
  process.exit(1);
}
